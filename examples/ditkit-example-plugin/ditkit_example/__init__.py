"""An example third-party ditkit plugin (see CONTRIBUTING.md, "Writing a plugin")."""
