"""The ``smedit`` subcommands, one module each; :data:`smedit_plugin.cli.COMMANDS` names them."""
