"""Text classification: the task, its data schema and calibration."""
