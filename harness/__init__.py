"""The test-support harness: real servers on loopback ports, generated data. Not part of the product."""
