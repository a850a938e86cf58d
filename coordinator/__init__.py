"""The consortium coordinator: the Flower ServerApp with SecAgg+, local consortium set-up, the demo."""
