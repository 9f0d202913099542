"""Consumers: the agency SDK, the reference agencies, and the receipt tracker."""
