"""Host-side orchestration: images, the libvirt domain, SSH, the Lab object."""
