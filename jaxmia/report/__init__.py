"""Reports: the HTML report and the image grids."""
