"""Publishing built datasets to the Hugging Face Hub: one commit and one ``vX.Y.Z`` tag per release."""

from bsafe_data.publish.errors import PublishError
from bsafe_data.publish.push import PushEvent, PushResult, push_dataset

__all__ = ["PublishError", "PushEvent", "PushResult", "push_dataset"]
