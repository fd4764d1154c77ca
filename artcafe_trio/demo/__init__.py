"""``artcafe-trio demo``: a staged story on an embedded hub, built on the public API."""
