"""Reference plugins shipped with ditkit."""
