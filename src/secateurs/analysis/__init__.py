"""Analysis of sparse networks: reports and plots (matplotlib is imported only when plotting)."""
