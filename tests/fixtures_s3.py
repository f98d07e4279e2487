"""S3 fixtures (moto server on loopback, fault proxy). Filled in by the S3 work."""
