"""Operator scripts (deployment rehearsal); importable so tests can drive `local_deployment`."""
