"""Provider simulators: test doubles of Entra ID + Exchange Online, Microsoft Graph and
Google + Gmail, written from the wire behaviour the real services show (see README.md here).

They serve HTTPS and IMAP/POP3/SMTP on 127.0.0.1 with the test bed's throwaway CA, put the real
Dovecot of the test bed behind their mail front ends, and take their situation per mailbox from
a Python API (``EntraSim.situation``, ``GoogleSim.situation``, ``token_fault`` ...). The pytest
fixtures are in ``tests.providers.plugin``.
"""
