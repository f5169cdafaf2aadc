"""Publishing built datasets to the Hugging Face Hub: one commit and one ``vX.Y.Z`` tag per release."""

from bsafe_data.publish.push import PublishError, PushResult, push_dataset

__all__ = ["PublishError", "PushResult", "push_dataset"]
