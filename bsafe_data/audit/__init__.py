"""Annotator audit: sample rows of a built dataset, judge them in a local web app, measure.

Modules, one job each: ``folder`` (read a dataset folder), ``questions`` (what is asked per row
kind), ``store`` (SQLite in WAL mode), ``sample`` (stratified audit sets), ``auth`` (annotator
tokens, sessions, CSRF), ``server`` (the web app), ``stats`` (agreement maths), ``report``
(figures and plot), ``apply`` (judgements back into the data), ``export`` (audit config rows,
Argilla and Label Studio files), ``cli`` (the ``bsafe-data audit`` commands).
"""
