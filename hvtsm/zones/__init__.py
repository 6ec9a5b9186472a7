"""Zone drivers: the places where workloads run. One module (or package) per backend."""
