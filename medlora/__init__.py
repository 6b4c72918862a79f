"""medlora: the library behind train.py, evaluate.py, chat.py and export.py."""
