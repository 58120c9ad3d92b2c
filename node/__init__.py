"""The prognode node: DICOM SCP, index, completion, routing, durable jobs, export, CLI."""
