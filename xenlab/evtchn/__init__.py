"""Event channels, grant pages and the Python device channel, driven on the
real lab: the agent does the work inside dom0 and the domU, these modules
start it, rendezvous and collect the reports."""


