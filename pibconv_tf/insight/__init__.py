"""What the networks and the search show: GradCAM maps and the paper's figures."""
