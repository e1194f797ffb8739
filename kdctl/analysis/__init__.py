"""Analyses of teacher/student pairs: the target conflict of CrossKD (``kdctl analyze-conflict``)."""
