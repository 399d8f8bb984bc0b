"""Corrections: factors fitted on measured points, and the estimate that applies them.

factors (fit, store and select the correction factors), points (measured points read back
from the raw calibration records), planning (the estimator `plan` and `check` use: raw or
corrected).
"""
