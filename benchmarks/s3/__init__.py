"""S3 save/load throughput: tierckpt vs s3torchconnector's DCP vs boto3 (see README.md)."""
