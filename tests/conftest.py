"""Test-session settings shared by every test module."""

from pibconv_tf import distribute

# As the apps do by default (--graph_optimizer=auto): no Grappler on a CPU, where it only
# lengthens the first call of every traced function.
distribute.configure_graph_optimizer("auto")
# As the apps do by default (--intra_op_threads=-1 --inter_op_threads=-1): on a small CPU,
# one thread per operation and one operation per core at once.
distribute.configure_threads()
