//! Test support: fake sysfs memory trees, agent processes (ours and the reference) and a blocking QGA client
