"""Monitoring: the host end of agent links, agents beside cgroup zones, anomalies and
the reactions they lead to."""
