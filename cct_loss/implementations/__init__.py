"""The implementations (``impl``) and the table that is the only door to them."""
