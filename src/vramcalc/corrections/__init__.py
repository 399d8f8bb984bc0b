"""Corrections: factors fitted on measured points, and the estimate that applies them.

factors (fit, store and select the correction factors), selection (what plan and check do
about them, and the decisions that read no file), points (measured points read back
from the raw calibration records), planning (the estimator `plan` and `check` use: raw or
corrected).
"""
