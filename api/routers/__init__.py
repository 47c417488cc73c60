"""The endpoints, one router per concern: locate (POST /locate, /locate/batch), meta (/health,
/version), metrics (/metrics), cells (/cells), page (the web page at / and its /static files).
`create_app` includes them, adding the API-key dependency to the protected ones when the server has a key."""
