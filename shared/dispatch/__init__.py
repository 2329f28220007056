"""Admission control: which queued job starts next, and the dispatcher that feeds the workers in that order."""
