"""The driver author's loop: kernel modules swapped in a running guest (and in dom0), their devices
taken away and given back around it, traced."""
