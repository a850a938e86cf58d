"""FedTwin's probe Flower app: the smallest real ServerApp/ClientApp pair (tests, benchmarks)."""
