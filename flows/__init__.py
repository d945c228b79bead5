"""The conversation layer: USSD menus and SMS commands, reaching the rest only through ports."""
