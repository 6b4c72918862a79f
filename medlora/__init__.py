"""The medlora library package: the code that the scripts share."""
