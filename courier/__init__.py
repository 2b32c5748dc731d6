"""The mail sender (`identity-worker courier`): reads `identity.courier`, sends one mail per
message over SMTP. A process of its own, with a broker user that may only read that queue;
see courier.app for what happens to each delivery."""
