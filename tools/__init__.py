"""Tools for measuring and reviewing the project (the study, the pull-request review): beside the library, not in it."""
