"""The paper's experiments: Table 1 (`sweep`, one genotype at several depths) and Fig. 1
(`roadmap`, search and training of each stage of the search space)."""
