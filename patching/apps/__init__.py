"""What users run: the `hooked-av` command (demo, flow, study, toy-data) and studies over datasets."""
