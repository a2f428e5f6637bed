"""The DAG and the command line."""
