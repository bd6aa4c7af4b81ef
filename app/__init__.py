"""The application: CLI, the demo job, the demo data set. Imports any stage; no stage imports it."""
