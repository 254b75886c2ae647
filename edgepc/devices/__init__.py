"""What comes back from the devices: report.json files of ``devices/*/validate.py``, attached
to the MLflow run that exported the bundle (``ingest``), and compared across devices
(``compare``)."""
