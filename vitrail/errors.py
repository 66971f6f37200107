class VitrailError(Exception):
    """An error the user can fix: bad config, unreadable data, missing checkpoint.

    The message names the file, key or value at fault and what was expected, so the
    command line can print it without a traceback.
    """
