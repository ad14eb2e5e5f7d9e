"""The Minecraft kit (issue #8): flying-squid in a Ferry container, mineflayer bots outside."""
