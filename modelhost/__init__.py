"""Models, not storage: loading and converting the bundled model (``models``), hosting it in the
server (``host``) and fingerprinting its weights (``fingerprint``)."""
