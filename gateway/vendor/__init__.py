"""The vendor API for banks, agents and sales points (``/vendor/v1``): signing and its rules."""
