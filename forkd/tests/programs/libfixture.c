/* A shared library whose answer identifies which build of it is mapped. */
int fixture_value(void) { return FIXTURE_VALUE; }
