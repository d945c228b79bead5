"""Kiswahili customer text. Keys and placeholders must match ``en.py`` and ``fr.py``."""

from typing import Final

MESSAGES: Final[dict[str, str]] = {
    # Navigation
    "nav_footer": "0 Rudi 00 Mwanzo",
    "nav_more": "Zaidi",
    "invalid_choice": "Chagua namba kutoka kwenye orodha.",
    # Home
    "home_title": "Umeme wa malipo ya awali",
    "menu_buy": "Nunua umeme",
    "menu_token": "Tokeni ya mwisho",
    "menu_meters": "Mita zangu",
    "menu_check": "Kagua mita",
    "menu_language": "Lugha",
    "menu_help": "Msaada",
    "resume_title": "Endelea ulipoishia?",
    "yes": "Ndiyo",
    "no": "Hapana",
    # Buying
    "buy_which": "Nunua kwa mita ipi?",
    "other_meter": "Mita nyingine",
    "enter_meter": "Weka namba ya mita:",
    "meter_bad_format": "Namba ya mita ina tarakimu 11 au 13.",
    "meter_bad_check": "{meter} si namba sahihi ya mita. Kagua tarakimu.",
    "meter_unknown": "Mita {meter} haijasajiliwa. Kagua namba.",
    "meter_card": "Mita {meter}\n{name}, {area}",
    "enter_amount": "Weka kiasi ({min} hadi {max}):",
    "amount_bad": "Andika kiasi kwa tarakimu tu.",
    "refused_below_minimum": "Kiwango cha chini ni {limit}.",
    "refused_above_maximum": "Kiwango cha juu ni {limit}.",
    "refused_unknown_meter": "Mita hii haijasajiliwa.",
    "refused_meter_blocked": "Mita hii haiwezi kuongezewa sasa. Piga simu kwa shirika.",
    "refused_purchase_pending": "Kuna ununuzi wa mita hii unaosubiri malipo. Umalize kwanza.",
    "refused_all_to_debt": "Deni la mita hii linachukua kiasi hiki. Nunua angalau {limit}.",
    "refused_unavailable": "Huduma ina shughuli nyingi. Jaribu tena baadaye.",
    "confirm_title": "Nunua {amount} kwa mita {meter}\n{units} kWh",
    "confirm_breakdown": "Umeme {energy}, kodi {tax}, ada {fees}",
    "confirm_debt": "Deni {debt}, baki {remaining}",
    "confirm_pay": "Lipa",
    "confirm_cancel": "Ghairi",
    "paying": "Utapokea ombi la malipo la {amount}. Weka PIN yako kulipa. Tokeni itakuja kwa SMS.",
    "cancelled": "Imeghairiwa. Hujatozwa chochote.",
    # Last token
    "token_which": "Tuma tokeni tena kwa:",
    "token_latest": "Ununuzi wa mwisho",
    "token_sent": "Tokeni yako ya mwisho ya mita {meter} ({amount}) inatumwa kwa SMS.",
    "token_none": "Hakuna tokeni kwa namba hii ya simu.",
    # My meters
    "meters_title": "Mita zangu",
    "meters_empty": "Huna mita zilizohifadhiwa.",
    "meters_add": "Ongeza mita",
    "meters_full": "Tayari una mita {max}. Ondoa moja kwanza.",
    "meter_actions": "{nickname}: mita {meter}",
    "meter_buy": "Nunua",
    "meter_remove": "Ondoa",
    "enter_nickname": "Jina la mita {meter} (herufi 12 au chini):",
    "nickname_bad": "Tumia herufi au tarakimu 1 hadi 12.",
    "meter_saved": "{nickname} imehifadhiwa.",
    "meter_renamed": "Jina jipya ni {nickname}.",
    "meter_removed": "{nickname} imeondolewa.",
    # Check a meter
    "check_result": "Mita {meter}\n{name}, {area}\nUnaweza kununua kuanzia {min} hadi {max}.",
    # Language
    "language_title": "Chagua lugha:",
    "language_set": "Lugha ni Kiswahili sasa.",
    # Help
    "help_text": (
        "Piga {code} kununua.\nAu SMS: BUY mita kiasi\nTOKEN: tokeni ya mwisho\n"
        "METERS: mita zako\nLANG EN, SW au FR"
    ),
    # Errors
    "error_generic": "Samahani, kuna hitilafu. Tafadhali jaribu tena.",
    "error_busy": "Huduma ina shughuli nyingi. Jaribu tena baada ya dakika moja.",
    "error_bad_request": "Samahani, hatukuweza kusoma ombi lako.",
    # SMS
    "sms_help": (
        "Kununua umeme tuma BUY mita kiasi, mfano BUY 37012345676 500. "
        "TOKEN: tokeni yako ya mwisho tena. METERS: mita zako. LANG EN, SW au FR: lugha."
    ),
    "sms_paying": (
        "Utapokea ombi la malipo la {amount} kwa mita {meter} ({units} kWh). "
        "Weka PIN yako kulipa. Tokeni itakuja kwa SMS."
    ),
    "sms_debt": "Kati ya hiki, {debt} kinalipa deni la mita; {remaining} kitabaki.",
    "sms_amount_negative": (
        "Kiasi lazima kiwe zaidi ya sifuri. Tuma BUY mita kiasi, mfano BUY 37012345676 500."
    ),
    "sms_amount_bad": "Kiasi hakieleweki. Tuma BUY mita kiasi, mfano BUY 37012345676 500.",
    "sms_meters": "Mita zako: {meters}",
    "sms_lang_usage": "Tuma LANG EN, LANG SW au LANG FR.",
    # The token SMS (flows/messages/tokens.py): full, terse, with a key change first, with debt
    "token_sms": "Tokeni ya umeme {token}. kWh {kwh} kwa {amount}. Mita {meter}. Risiti {receipt}.",
    "token_sms_short": "Tokeni {token} {kwh}kWh {amount} Mita {meter} Risiti {receipt}",
    "token_sms_key_change": (
        "Ufunguo mpya wa mita: weka {kcts} kwanza, kisha tokeni {token}. kWh {kwh} kwa"
        " {amount}. Mita {meter}. Risiti {receipt}."
    ),
    "token_sms_key_change_short": (
        "Weka {kcts} kisha {token} {kwh}kWh {amount} Mita {meter} Risiti {receipt}"
    ),
    "token_sms_debt": " Deni lililolipwa {recovered}, deni lililobaki {remaining}.",
    "token_sms_debt_short": " Deni {recovered} baki {remaining}",
    "fbe_sms": "Umeme wa bure wa msingi wa {month}: tokeni {token}. kWh {kwh}. Mita {meter}.",
}
