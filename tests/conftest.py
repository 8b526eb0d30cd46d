"""Fixtures shared by the whole test suite."""

from gcs_emulator import gcs_emulator_fixture

# A running GCS emulator with bucket "test-bucket" and STORAGE_EMULATOR_HOST set (see
# tests/gcs_emulator.py; build one with another bucket or scope with gcs_emulator_fixture()).
gcs_emulator = gcs_emulator_fixture()
