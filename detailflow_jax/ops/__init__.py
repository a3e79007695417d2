"""Small pure array functions shared by models and data workers."""
