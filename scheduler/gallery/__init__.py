"""The gallery: a batch as one static HTML page, a card per job (`ipab gallery` and the API)."""
