"""One module per ``ssah-plugin`` subcommand (see :mod:`ssah_plugin.cli`)."""
