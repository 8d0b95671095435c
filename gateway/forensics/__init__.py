"""Forensics: question a suspect model (probe), and say what its answers show, with the evidence (report)."""
