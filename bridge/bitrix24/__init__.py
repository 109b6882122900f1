"""The Bitrix24 source: webhook, REST client, OAuth, the offline queue and its helpers."""
