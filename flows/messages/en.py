"""English customer text. Keys and placeholders must match ``sw.py`` and ``fr.py``."""

from typing import Final

MESSAGES: Final[dict[str, str]] = {
    # Navigation
    "nav_footer": "0 Back 00 Home",
    "nav_more": "More",
    "invalid_choice": "Choose a number from the list.",
    # Home
    "home_title": "Prepaid electricity",
    "menu_buy": "Buy electricity",
    "menu_token": "Last token",
    "menu_meters": "My meters",
    "menu_check": "Check a meter",
    "menu_language": "Language",
    "menu_help": "Help",
    "resume_title": "Continue where you left off?",
    "yes": "Yes",
    "no": "No",
    # Buying
    "buy_which": "Buy for which meter?",
    "other_meter": "Another meter",
    "enter_meter": "Enter the meter number:",
    "meter_bad_format": "A meter number has 11 or 13 digits.",
    "meter_bad_check": "{meter} is not a valid meter number. Check the digits.",
    "meter_unknown": "Meter {meter} is not registered. Check the number.",
    "meter_card": "Meter {meter}\n{name}, {area}",
    "enter_amount": "Enter amount ({min} to {max}):",
    "amount_bad": "Type the amount in numbers only.",
    "refused_below_minimum": "The minimum is {limit}.",
    "refused_above_maximum": "The maximum is {limit}.",
    "refused_unknown_meter": "This meter is not registered.",
    "refused_meter_blocked": "This meter cannot be topped up now. Call the utility.",
    "refused_purchase_pending": "A purchase for this meter awaits payment. Finish it first.",
    "refused_all_to_debt": "This meter's debt takes most of this amount. Buy at least {limit}.",
    "refused_unavailable": "Service is busy. Please try again later.",
    "confirm_title": "Buy {amount} for meter {meter}\n{units} kWh",
    "confirm_breakdown": "Energy {energy}, tax {tax}, fees {fees}",
    "confirm_debt": "Debt recovered {debt}, left {remaining}",
    "confirm_pay": "Pay",
    "confirm_cancel": "Cancel",
    "paying": (
        "You will get a payment prompt for {amount}. Enter your "
        "PIN to pay. Your token will come by SMS."
    ),
    "cancelled": "Cancelled. Nothing was charged.",
    # Last token
    "token_which": "Send the token again for:",
    "token_latest": "Latest purchase",
    "token_sent": "Your last token for meter {meter} ({amount}) is on its way by SMS.",
    "token_none": "No token found for this phone number.",
    # My meters
    "meters_title": "My meters",
    "meters_empty": "You have no saved meters.",
    "meters_add": "Add a meter",
    "meters_full": "You already have {max} meters. Remove one first.",
    "meter_actions": "{nickname}: meter {meter}",
    "meter_buy": "Buy",
    "meter_remove": "Remove",
    "enter_nickname": "Name for meter {meter} (up to 12 letters):",
    "nickname_bad": "Use 1 to 12 letters or digits.",
    "meter_saved": "Saved {nickname}.",
    "meter_renamed": "Renamed to {nickname}.",
    "meter_removed": "Removed {nickname}.",
    # Check a meter
    "check_result": "Meter {meter}\n{name}, {area}\nYou can buy from {min} to {max}.",
    # Language
    "language_title": "Choose a language:",
    "language_set": "Language set to English.",
    # Help
    "help_text": (
        "Dial {code} to buy.\nOr SMS: BUY meter amount\nTOKEN: last token again\n"
        "METERS: your meters\nLANG EN, SW or FR"
    ),
    # Errors
    "error_generic": "Sorry, something went wrong. Please try again.",
    "error_busy": "Service is busy. Please try again in a minute.",
    "error_bad_request": "Sorry, we could not read your request.",
    # SMS
    "sms_help": (
        "To buy electricity send BUY meter amount, e.g. BUY 37012345676 500. "
        "TOKEN: your last token again. METERS: your saved meters. LANG EN, SW or FR: language."
    ),
    "sms_paying": (
        "You will get a payment prompt for {amount} for meter {meter} ({units} kWh). "
        "Enter your PIN to pay. Your token will come by SMS."
    ),
    "sms_debt": "Of this, {debt} goes to the meter's debt; {remaining} will remain.",
    "sms_amount_negative": (
        "The amount must be more than zero. Send BUY meter amount, e.g. BUY 37012345676 500."
    ),
    "sms_amount_bad": "Amount not understood. Send BUY meter amount, e.g. BUY 37012345676 500.",
    "sms_meters": "Your meters: {meters}",
    "sms_lang_usage": "Send LANG EN, LANG SW or LANG FR.",
    # The token SMS (flows/messages/tokens.py): full, terse, with a key change first, with debt
    "token_sms": (
        "Electricity token {token}. {kwh} kWh for {amount}. Meter {meter}. Receipt {receipt}."
    ),
    "token_sms_short": "Token {token} {kwh}kWh {amount} Mtr {meter} Rcpt {receipt}",
    "token_sms_key_change": (
        "New meter key: enter {kcts} first, then token {token}. {kwh} kWh for {amount}."
        " Meter {meter}. Receipt {receipt}."
    ),
    "token_sms_key_change_short": (
        "Enter {kcts} then {token} {kwh}kWh {amount} Mtr {meter} Rcpt {receipt}"
    ),
    "token_sms_debt": " Debt recovered {recovered}, remaining {remaining}.",
    "token_sms_debt_short": " Debt {recovered} bal {remaining}",
    "fbe_sms": "Free basic electricity for {month}: token {token}. {kwh} kWh. Meter {meter}.",
}
